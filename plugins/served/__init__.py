"""The served family: ``openai``, generation from an OpenAI-protocol server or hosted API (its HTTP
client is ``shared/openai_client.py``, which the judge's served backend uses too)."""
