"""The math of one cut and the stage step: the bottom layer.

Synthetic-gradient modules (``synthetic``), the boundary methods of the paper's unified
table (``methods``, ``feedback``), how a network is cut (``partition``), what a task's
loss and labels are (``tasks``), what stages say to each other (``messages``), one stage's
step as an event-driven state machine (``stage``) and what a stage reports about itself
(``probe``, ``histogram``). Pure PyTorch: no Ray, no sockets, no files. Modules here import
only each other and ``dni_dist.errors``.
"""
