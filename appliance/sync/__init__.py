"""Store-and-forward to the school hub over MQTT: transport, uplink, downlink, signing."""
