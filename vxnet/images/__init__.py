"""Built-in container images: tiny servers that run inside a container's namespace."""
