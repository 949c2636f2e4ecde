"""Lua scripts, one per state change, loaded by broker.state.store."""
