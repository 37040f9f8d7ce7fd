"""What a job leaves for people: the manifest, the report, the dataset card, Prefect artifacts, agreement."""
