"""Static files of the operators' dashboard (served by broker.http.dashboard)."""
