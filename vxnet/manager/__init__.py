"""The swarm manager: persistent state, address allocation and task scheduling."""
