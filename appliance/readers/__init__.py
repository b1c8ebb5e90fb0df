"""Card readers behind one small interface (see ``base``): PC/SC, keyboard-wedge, socket."""
