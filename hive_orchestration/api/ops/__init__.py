"""The operations of the seeds, carried by both front doors (:class:`Runtime` and
:class:`OrchestrationClient`) as mixins: each turns a call, checked whole, into a typed
message to the actor that owns the answer. One family per module."""
