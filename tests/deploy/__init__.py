"""Checks of the container image, the Kubernetes manifests and the monitoring in deploy/."""
