"""trio-mapper: one local engine that owns an OpenAI API key and its rate limits.

Importing this package stays light (msgspec and the standard library): client programs do not pull in
trio or httpx.
"""

__version__ = "0.1.0"
