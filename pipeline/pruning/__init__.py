"""What is pruned and when: masks, importance, aggregation, schedule, selection, the pruner, rank pruning."""
