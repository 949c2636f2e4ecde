"""Lua scripts, one per state change, loaded by broker.state.store; bucket.lua (a token bucket timed by
Redis's clock) by broker.state.buckets."""
