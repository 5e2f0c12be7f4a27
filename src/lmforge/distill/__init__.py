"""Knowledge distillation as a stage: the teacher a student learns from (teacher.py), students cut from a teacher
(student.py), `lmforge distill ...` (cli.py). The loss and the objective are train/distill.py."""
