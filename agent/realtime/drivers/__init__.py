"""Client programs run inside the separate client environment (agent/realtime/clients.py), never imported by the
project: each drives one real client library against a running server and prints a JSON report."""
