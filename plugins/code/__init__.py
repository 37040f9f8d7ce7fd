"""The code family: code generation, the sandbox that runs it, pass@k."""
