"""edgeproxy: a Kubernetes ingress data plane."""
__version__ = "0.1.0"
