"""Cluster simulation and planning: latency models, a discrete-event simulator, a placement planner."""
