"""Replicas, routers and the cluster-level simulation."""
