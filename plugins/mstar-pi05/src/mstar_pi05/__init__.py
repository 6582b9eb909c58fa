"""Pi0.5 (lerobot/pi05_base) for mstar: camera images, an instruction and the robot's state in, a chunk of future actions out."""
