"""Extraction campaigns: simulated honest users and attackers against the guard, defended or not.

``python -m load_tests.campaign`` (:mod:`.cli`) runs them. The modules, in the order a run
uses them: :mod:`.config` (settings, populations, the phase's guard config), :mod:`.driver`
(the compressed timeline), :mod:`.phase` (one guard, driven and summarized),
:mod:`.analysis` (decisions and summaries), :mod:`.replay` (detection offline, no guard),
:mod:`.students` (what the collected data is worth), :mod:`.report`.
"""
