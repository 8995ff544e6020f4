"""The `vllm.general_plugins` entry point: registers `MemoryLLMConnector` under its name, in every vLLM process."""

CONNECTOR = "MemoryLLMConnector"


def register() -> None:
    """Make `--kv-transfer-config '{"kv_connector": "MemoryLLMConnector", ...}'` work (idempotent)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR, "memoryllm_vllm.connector", CONNECTOR)
