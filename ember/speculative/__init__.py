"""Speculative decoding: propose several tokens cheaply, verify them in one pass of the target model.

Decode at batch 1 reads every weight once per token; a verification pass over ``k + 1`` rows reads them once for
up to ``k + 1`` tokens. Proposers (:mod:`.proposers`): prompt lookup (n-gram) and a small draft model.
Verification (:mod:`.verify`) keeps greedy output identical to plain decoding and sampled output distributed
as the target's (the rejection rule). :mod:`.adaptive` picks k from the measured acceptance and switches
speculation off where it does not pay. :mod:`.decoding` runs one sequence for the engine; :mod:`.batched` runs
every sequence of a continuous batch for the scheduler, all verified in one forward.
"""

from ember.speculative.adaptive import AdaptiveK, SpeculationCounters, expected_tokens
from ember.speculative.decoding import (DEFAULT_NUM_SPECULATIVE, METHODS, SpeculativeConfig, SpeculativeDecoder,
                                        check_target, supports)
from ember.speculative.proposers import DraftProposer, NgramProposer, Proposer, check_rollback
from ember.speculative.verify import accept_greedy, accept_sampled

__all__ = ["AdaptiveK", "DEFAULT_NUM_SPECULATIVE", "DraftProposer", "METHODS", "NgramProposer", "Proposer",
           "SpeculationCounters", "SpeculativeConfig", "SpeculativeDecoder", "accept_greedy", "accept_sampled",
           "check_rollback", "check_target", "expected_tokens", "supports"]
