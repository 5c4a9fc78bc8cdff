"""The data step: synthetic shards (`fusedit data synth`), the filter and its quality report
(`fusedit data filter`), and the comparison of two filter outputs (`fusedit data compare`)."""

PUBLIC = ("scenes",)  # the scene grammar, which the evaluate step's synthetic judge scores against
