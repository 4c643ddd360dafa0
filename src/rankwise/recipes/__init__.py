"""Recipes: the top of the house. Each reads top to bottom and composes the parts below it (data,
models, methods, optimizers, hooks, the loop's pieces in rankwise.train); nothing below imports them.

    train        fine-tune a model with a method and an optimizer (`rankwise train`)
    pretrain     pre-train a small Llama from scratch, for the low-rank optimizers (`rankwise pretrain`)
    task_metric  ROUGE-L of greedy replies, the task metric the train recipe reports
"""
