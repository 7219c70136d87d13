"""llmc.compiler: the IR (dtypes, symbolic dims, ops, nodes), its inference, reference
semantics, interpreter, printer and verifier, and the frontends that build it."""
