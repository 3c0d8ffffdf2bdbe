"""``vxnet trace``: live packets from a lab, printed as the layers a learner reads.

* :mod:`vxnet.trace.context` - the names and keys, gathered once from the lab's daemons;
* :mod:`vxnet.trace.dissect` - ``describe(frame, context) -> list[Layer]`` (pure; uses scapy);
* :mod:`vxnet.trace.payloads` - ESP, gossip, networkdb and DNS, read with vxnet's own codecs;
* :mod:`vxnet.trace.layers` - the ``Layer`` record, filters and the text/JSON renderers;
* :mod:`vxnet.trace.capture` - AF_PACKET sockets opened inside a namespace, and a pcap writer.

scapy (GPL-2.0) is an optional extra (``pip install vxnet[trace]``): only ``dissect`` imports it,
and nothing imports ``dissect`` but the ``trace`` command, so ``vxnet --help`` works without it.
"""

from vxnet.trace.context import Endpoint, NetworkInfo, TraceContext, context_from_lab
from vxnet.trace.layers import Layer, Packet, TraceFilter, render_json, render_text

__all__ = [
    "Endpoint",
    "Layer",
    "NetworkInfo",
    "Packet",
    "TraceContext",
    "TraceFilter",
    "context_from_lab",
    "render_json",
    "render_text",
]
