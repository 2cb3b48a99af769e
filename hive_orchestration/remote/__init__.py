"""The message API across processes: the owner's socket server, the client's connection,
and the wire between them (:mod:`.protocol`). Nothing here is public but the structs of
``OrchestrationClient.server_status`` (:mod:`.status`, exported by the package): a client
reaches the rest through ``OrchestrationClient(db_path=...)``, which connects when
another process owns the database."""
