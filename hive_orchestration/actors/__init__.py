"""The actors. Each module is one actor; they share only :mod:`hive_orchestration.messages`.

The supervisor is part of the kernel (:mod:`hive_orchestration.runtime.supervisor`): it is
generic and knows no domain word. The storage actor lives in :mod:`hive_orchestration.storage`
with the schema it owns.
"""
