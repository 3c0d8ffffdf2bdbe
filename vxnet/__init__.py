"""vxnet: Docker swarm overlay networking, in userspace Python."""

__version__ = "0.1.0"
