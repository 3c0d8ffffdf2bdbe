"""Service discovery: the embedded DNS server every container finds on 127.0.0.11.

* :mod:`vxnet.dns.records` -- ``EndpointRecord`` (endpoint_table values) and the ``Directory``;
* :mod:`vxnet.dns.resolver` -- the sans-IO resolver: query bytes in, answer/forward/drop out;
* :mod:`vxnet.dns.server` -- the trio service bound inside a container's namespace.
"""

from vxnet.dns.records import Directory, EndpointRecord, decode_endpoint_record_untrusted
from vxnet.dns.resolver import Answer, Drop, Forward, Resolver

__all__ = [
    "Answer",
    "Directory",
    "Drop",
    "EndpointRecord",
    "Forward",
    "Resolver",
    "decode_endpoint_record_untrusted",
]
