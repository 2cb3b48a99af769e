"""The vocabulary actors share. Actors import these modules, never each other.

Every message is a frozen msgspec Struct; each actor's inbox is a closed union of them.
"""
