"""gmagen.backends: one package per backend, found through ``registry``."""
