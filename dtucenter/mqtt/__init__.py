"""MQTT publishing: the event hub's uploads, polls and state changes, sent to a broker (docs/integrations.md)."""
