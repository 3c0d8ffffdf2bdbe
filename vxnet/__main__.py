"""`python -m vxnet` is the `vxnet` command."""

from vxnet.cli import main

main()
