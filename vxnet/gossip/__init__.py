"""Gossip on 7946: SWIM with Lifeguard, wire-compatible with hashicorp/memberlist, and networkdb."""
