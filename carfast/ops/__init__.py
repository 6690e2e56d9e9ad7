"""carfast's ops: each file holds one op's plain-PyTorch reference, its compiled launchers and the
public function that picks a backend. The reference is the ``torch`` backend and the oracle that
tests and benchmarks import."""
