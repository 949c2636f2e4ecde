"""Static files of the operators' dashboard (served by broker.dashboard)."""
