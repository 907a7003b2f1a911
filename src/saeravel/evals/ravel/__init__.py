"""``eval=ravel`` (module map: see main)."""
