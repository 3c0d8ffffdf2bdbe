"""networkdb's entries as rows a person reads: ``vxnet gossip tables`` and ``/gossip/tables``.

Pure: the values of ``overlay_peer_table`` (Docker's PeerRecord) and ``endpoint_table``
(EndpointRecord) are decoded; one that does not decode shows its reason instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vxnet.dns.records import decode_endpoint_record_untrusted
from vxnet.errors import BadPacket
from vxnet.gossip.networkdb import Entry, decode_peer_record_untrusted


def table_rows(
    entries: Mapping[tuple[str, str, str], Entry], names: Mapping[str, str], wanted: str | None
) -> list[dict[str, Any]]:
    """Every entry (tombstones and hidden ones too, marked), of network ``wanted`` (a name or
    an id) or of all."""
    rows = []
    for (net, table, key), entry in sorted(entries.items()):
        name = names.get(net, net)
        if wanted and wanted not in (net, name):
            continue
        row: dict[str, Any] = {
            "network": name,
            "network_id": net,
            "table": table,
            "key": key,
            "owner": entry.owner,
            "ltime": entry.ltime,
            "deleting": entry.deleting,
            "hidden": entry.hidden,
        }
        if table == "endpoint_table" and not entry.deleting:
            try:
                ep = decode_endpoint_record_untrusted(entry.value)
                row.update(
                    name=ep.name,
                    service_name=ep.service_name,
                    endpoint_ip=ep.endpoint_ip,
                    virtual_ip=ep.virtual_ip,
                    service_disabled=ep.service_disabled,
                )
            except BadPacket as exc:
                row["value_error"] = exc.reason
        if table == "overlay_peer_table":
            try:
                rec = decode_peer_record_untrusted(entry.value)
                row.update(
                    endpoint_ip=rec.endpoint_ip,
                    endpoint_mac=rec.endpoint_mac,
                    tunnel_endpoint_ip=rec.tunnel_endpoint_ip,
                )
            except BadPacket as exc:
                row["value_error"] = exc.reason
        rows.append(row)
    return rows
