"""The recycle_router: request filter, decision and the per-user stage cache in Redis."""
