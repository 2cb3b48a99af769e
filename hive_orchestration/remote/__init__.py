"""The message API across processes: the owner's socket server, the client's connection,
and the wire between them (:mod:`.protocol`). Nothing here is public: a client reaches it
through ``OrchestrationClient(db_path=...)``, which connects when another process owns the
database."""
