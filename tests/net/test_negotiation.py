"""Transfer syntax negotiation as the conformance statement (2.1) describes it, over a real association."""

from __future__ import annotations

from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, build_context


def _accepted(port: int, *syntaxes_per_context: list[str]) -> list[str]:
    """The transfer syntax the node accepts for each proposed CT context, in proposal order."""
    ae = AE(ae_title="NEGOTIATE")
    ae.requested_contexts = [build_context(CTImageStorage, list(s)) for s in syntaxes_per_context]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    try:
        assert assoc.is_established
        return [str(cx.transfer_syntax[0]) for cx in sorted(assoc.accepted_contexts, key=lambda c: c.context_id)]
    finally:
        assoc.release()


def test_the_node_order_wins_over_the_proposal_order(node):
    # Implicit before Explicit in the proposal: the node's first syntax (Explicit VR LE) is taken.
    accepted = _accepted(node.port, [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
                         [RLELossless, ExplicitVRBigEndian, ImplicitVRLittleEndian], [RLELossless, ExplicitVRBigEndian])
    assert accepted == [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
