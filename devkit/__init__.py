"""Development kit: throwaway PostgreSQL clusters, a loopback S3 endpoint and sample data.

Shared by the tests, `make demo` and the benchmarks, so that all three exercise the engine
against the same real parts. Not shipped to Lambda.
"""
