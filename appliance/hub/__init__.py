"""The school hub: ingest from the gates, parent notifications, reports, the read-only API."""
