"""Clients of the outside world: Redis stores, upstream channels, WeChat and WeChat Pay."""
