"""What a job reads and writes: storage, the output layout, prompts, resume markers, the lease, the journal."""
