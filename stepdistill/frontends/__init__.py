"""The front ends: the ``stepdistill`` command (:mod:`.cli`, its tool commands in :mod:`.cli_tools`) and the
teacher-vs-student demo (:mod:`.demo`, the computation; :mod:`.demo_ui`, the Gradio app). They sit on top of the
library and nothing in it imports them."""
