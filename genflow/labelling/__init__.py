"""People in the loop: tasks for a labelling tool, and what their labels become."""
