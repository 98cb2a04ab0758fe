"""``savlt deploy-local``: a real Flower deployment (TLS + SuperNode authentication) on one
machine, split by job: certificates, processes, the flwr CLI, and the orchestration
(:mod:`tools.deploy.local`). See docs/deploy.md for the same steps by hand.
"""
