def missing(module: str):
    """Module ``__getattr__`` that returns a callable failing with a clear message."""

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"{module}.{name} is not available in the CPU lane stub")

        return op

    return getattr_
