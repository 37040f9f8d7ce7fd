"""The labelling family: ``label-studio``, which sends candidates to Label Studio and reads people's
rankings and demonstrations back."""
