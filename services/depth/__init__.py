"""kinema.depth.v1.Depth: images -> relative inverse depth (MiDaS-style, Gen-1 structure)."""
