"""CAR scoring: ``LayerScorer`` (a layer) and ``GroupScorer`` (a coupling group) on one engine, with the
evaluation methods as objects with one face (``method.ScoringMethod``: ``suffix_eval``, ``closed_form_method``,
``full_network_method``), exact low precision
(``precision``), the raced search for greedy CAR's choice (``race``), and the results
(``scores.LayerScores``, ``classwise.ClassImportance``)."""
from carfast.scoring.classwise import ClassImportance
from carfast.scoring.group_scorer import GroupScorer, score_group
from carfast.scoring.race import Race
from carfast.scoring.scorer import LayerScorer, ScoreOptions, score_layer
from carfast.scoring.scores import LayerScores

__all__ = ["LayerScorer", "ScoreOptions", "score_layer", "GroupScorer", "score_group", "LayerScores", "ClassImportance",
           "Race"]
