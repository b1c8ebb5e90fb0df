"""Builds the reader objects a gate.toml asks for; PC/SC readers share one watcher thread."""

from __future__ import annotations

from appliance.config import ReaderConfig
from appliance.readers.base import CardReader


def build_readers(configs: list[ReaderConfig]) -> list[CardReader]:
    readers: list[CardReader] = []
    pcsc = [c for c in configs if c.type == "pcsc"]
    if pcsc:
        from appliance.readers.pcsc import PcscReaders

        readers.append(PcscReaders(pcsc))
    for config in configs:
        if config.type == "wedge":
            from appliance.readers.wedge import WedgeReader

            readers.append(WedgeReader(config))
        elif config.type == "socket":
            from appliance.readers.socket_reader import SocketReader

            readers.append(SocketReader(config))
    return readers
